from chatsmith.cli import main

raise SystemExit(main())
