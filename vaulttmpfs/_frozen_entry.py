"""PyInstaller's entry script (it runs a file, not a package, so imports here are absolute)."""

from vaulttmpfs.entry import main

raise SystemExit(main())
