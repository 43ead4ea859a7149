"""Token mixers: nn.Modules holding projections / position terms around the functional ops."""
from .base import OpMixer, set_backend  # noqa: F401
from .channel import ChannelAttention  # noqa: F401
from .halo import HaloAttention  # noqa: F401
from .linear import LinearAttention  # noqa: F401
from .neighborhood import NeighborhoodAttention  # noqa: F401
from .pooling import Pooling  # noqa: F401
from .single_head import SingleHeadAttention  # noqa: F401
from .window import PartitionAttention, RelPosBiasTf  # noqa: F401
