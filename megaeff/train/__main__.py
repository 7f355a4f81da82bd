from megaeff.cli.train import main

main()
