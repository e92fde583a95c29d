import sys

from gptoss_serve.cli import main

sys.exit(main())
