"""`python -m vlprompt.run` as before the move to vlprompt/experiments/ (the task scripts call it)."""
import sys

from vlprompt.experiments.run import main

sys.exit(main(last_job_here=True))
