import sys

from newllm.cli import main

sys.exit(main())
