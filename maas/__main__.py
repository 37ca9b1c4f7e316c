from maas.cli.main import main

raise SystemExit(main())
