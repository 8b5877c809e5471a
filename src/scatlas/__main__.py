from scatlas.cli import main

main()
