"""Token mixers: nn.Modules holding projections / position terms around the functional ops."""
from .pooling import Pooling  # noqa: F401
from .single_head import SingleHeadAttention  # noqa: F401
from .window import PartitionAttention, RelPosBiasTf  # noqa: F401
