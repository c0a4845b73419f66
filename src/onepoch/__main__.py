from onepoch.cli import main

raise SystemExit(main())
