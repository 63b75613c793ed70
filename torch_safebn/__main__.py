"""`python -m torch_safebn info | check | bench | demo`: the torch-safebn command."""
from .tools.cli import main

raise SystemExit(main())
