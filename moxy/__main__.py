from moxy.cli import main

main()
