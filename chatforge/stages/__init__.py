"""One module per CLI stage (`chatforge <stage>`), named like the stage: its ``Config`` and ``run``."""
