"""`python -m vlprompt.sweep` as before the move to vlprompt/experiments/."""
import sys

from vlprompt.errors import report_user_errors
from vlprompt.experiments.sweep import main

sys.exit(report_user_errors(main)())
