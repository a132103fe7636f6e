from llamafactory_vision.tiny import main

main()
