from container2boot.cli import main

main()
