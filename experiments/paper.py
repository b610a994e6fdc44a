"""The SPO paper's grid now ships with the package: ``spo_jax/configs/paper.py`` (``--config=paper:<arg>``).

This file stays so that ``--config experiments/paper.py:<arg>`` and ``python experiments/paper.py --list``
keep working in a checkout.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spo_jax.configs.paper import get_config, hf_config, main  # noqa: E402,F401

if __name__ == "__main__":
    main()
