from engine.evaluate.command import main

main()
