from llamafactory_vision.synth import main

raise SystemExit(main())
