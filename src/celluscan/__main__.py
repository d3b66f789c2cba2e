from celluscan.cli import main

raise SystemExit(main())
