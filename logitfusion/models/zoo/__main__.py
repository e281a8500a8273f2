"""`python -m logitfusion.models.zoo`: build the zoo (see logitfusion.models.zoo.cli.main)."""

import sys

from logitfusion.models.zoo.cli import main

sys.exit(main())
