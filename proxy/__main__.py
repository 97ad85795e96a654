"""`python -m proxy ...` is the same as `gatewise ...`."""

from proxy.cli import main

raise SystemExit(main())
