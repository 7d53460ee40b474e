"""`python -m jaxllm.cli ...` is `jaxllm ...`."""

import sys

from jaxllm.cli import main

sys.exit(main())
