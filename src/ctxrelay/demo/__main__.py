import sys

from ctxrelay.demo import main

sys.exit(main())
