"""The zoo's token-mixer ops. One functional API per op; backends are picked by ``mixzoo.ops._dispatch``
(``python -m mixzoo.ops info`` prints every op x backend and whether it can run here)."""
from ._dispatch import BackendError, backends, forced_backend, forcing, select  # noqa: F401
from .dwconv import depthwise_conv2d  # noqa: F401
from .gelu import gelu_tanh  # noqa: F401
from .halo import halo_attention  # noqa: F401
from .linear import linear_attention  # noqa: F401
from .neighborhood import neighborhood_aggregate, neighborhood_attention  # noqa: F401
from .routing import bilevel_routing_attention, routed_attention, routing_topk  # noqa: F401
from .window import window_attention  # noqa: F401

__all__ = ['window_attention', 'halo_attention', 'neighborhood_attention', 'neighborhood_aggregate',
           'routing_topk', 'routed_attention', 'bilevel_routing_attention', 'linear_attention',
           'gelu_tanh', 'depthwise_conv2d', 'BackendError', 'backends', 'select', 'forced_backend', 'forcing']
