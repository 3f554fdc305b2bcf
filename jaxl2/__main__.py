from jaxl2.cli import main

raise SystemExit(main())
