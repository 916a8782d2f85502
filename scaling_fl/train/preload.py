"""What the sites' fork server imports once, so every site starts with it already loaded."""

import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: F401
from transformers.models.bert import modeling_bert  # noqa: F401  (MiniLM, tiny-bert)

from scaling_fl.train import federated  # noqa: F401
