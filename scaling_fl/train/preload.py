"""What the sites' fork server imports once, so every site starts with it already loaded.

Imported in the fork server, whose parent is the launcher: it asks to die with the launcher,
so a launcher killed with SIGKILL leaves no fork server (and through it, no site) behind.
"""

import importlib.util
import os

from scaling_fl import processes

_launcher = os.environ.get(processes.LAUNCHER_PID_ENV)
if _launcher and _launcher.isdigit():
    processes.die_with_parent(expected_parent=int(_launcher))

with processes.imports_without_gc(freeze=True):  # every site is forked from what is loaded now
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: F401
    from transformers.models.bert import modeling_bert  # noqa: F401  (MiniLM, tiny-bert)

    from scaling_fl.train import federated  # noqa: F401

    # pyarrow imports pandas, where it is installed, on its first conversion from numpy (a site's first
    # read of its rows): once here instead of in every site, ~0.4 s of CPU each.
    if importlib.util.find_spec("pandas") is not None:
        import pandas  # noqa: F401
