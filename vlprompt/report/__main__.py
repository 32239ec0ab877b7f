"""`python -m vlprompt.report` as before the move to vlprompt/experiments/ (scripts/demo.sh calls it)."""
import sys

from vlprompt.experiments.report import main

sys.exit(main())
