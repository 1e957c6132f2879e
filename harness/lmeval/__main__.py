"""``python -m harness.lmeval ...``: lm-eval's own command line with ``moe-harness`` registered (= ``harness lm-eval``)."""
import sys

from harness.errors import UserError
from harness.lmeval.entry import lm_eval_cli

try:
    sys.exit(lm_eval_cli(sys.argv[1:]))
except UserError as exc:  # one line, as the harness CLI prints it
    print(f"harness: error: {exc}", file=sys.stderr)
    sys.exit(2)
