from mecqtk.cli import main

main()
