from distrain.cli import main

raise SystemExit(main())
