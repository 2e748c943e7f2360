from segbatch.cli import main

raise SystemExit(main())
