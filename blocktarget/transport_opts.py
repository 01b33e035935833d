"""NVMe/TCP transport options, as SPDK's nvmf_create_transport names them.

Kept apart from transport_tcp.py so the control plane can validate and save them
without importing the socket side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidParams
from .params import Param, Schema, positive

# Connection placement policies (ReactorPool.pick): "round_robin" spreads connections
# in arrival order, as SPDK does; "least_connections" sends each new connection to the
# reactor with the fewest live ones, which stays even when hosts come and go.
PLACEMENTS = ("round_robin", "least_connections")


@dataclass
class TransportOptions:
    trtype: str = "TCP"
    max_queue_depth: int = 128
    max_io_qpairs_per_ctrlr: int = 127
    in_capsule_data_size: int = 8192
    max_io_size: int = 131072
    io_unit_size: int = 131072
    max_aq_depth: int = 128
    c2h_success: bool = True
    header_digest: bool = True  # whether hosts may enable them
    data_digest: bool = True
    max_r2t_per_qpair: int = 1  # MAXR2T: R2Ts outstanding per command
    sock_priority: int = 0
    abort_timeout_sec: int = 1
    # blocktarget's own: how accepted connections are spread over reactors
    placement: str = "round_robin"
    # SPDK's pool of io_unit_size data buffers. Here: the bound on R2T buffer memory of
    # the whole transport (511 x 128 KiB ~ 64 MiB, SPDK's TCP default), split evenly
    # over the reactors; a write that does not fit waits for its R2T.
    num_shared_buffers: int = 511
    # blocktarget's own limits (tcp_limits.py says why each exists); 0 disables one
    max_qpair_buffer_bytes: int = 8 << 20  # R2T buffers one connection may hold
    max_connections: int = 4096  # open NVMe/TCP connections, all listeners
    max_connections_per_address: int = 1024  # from one host address
    stall_timeout_sec: int = 30  # a PDU begun but unfinished; or no Connect yet
    r2t_timeout_sec: int = 30  # an R2T whose data has not all arrived
    # reads, writes and flushes on the backends the C lane serves run in C
    # (nvme/fastlane.py); false: every command takes the Python path
    c_fast_path: bool = True
    # the socket of an I/O queue pair in its steady state is served by the reactor's C
    # poller (nvme/netpoll.py); false: the event loop reads it and calls the lane
    c_net_poll: bool = True
    # TLS connections' record layer: "auto" hands it to kernel TLS after the handshake
    # where the kernel has it (ktls.py), else keeps it in user space; "user" always keeps
    # it in user space (OpenSSL)
    tls_record_layer: str = "auto"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TransportOptions:
        p = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and v is not None}
        p["trtype"] = str(params.get("trtype") or "TCP").upper()
        if p["trtype"] != "TCP":
            raise InvalidParams(f"parameter 'trtype' {params.get('trtype')!r}: only TCP is supported")
        opts = cls(**p)
        if opts.max_queue_depth < 2 or opts.max_queue_depth > 65536:
            raise InvalidParams("parameter 'max_queue_depth' must be between 2 and 65536")
        if opts.max_aq_depth < 2 or opts.max_aq_depth > 4096:
            raise InvalidParams("parameter 'max_aq_depth' must be between 2 and 4096")
        if opts.in_capsule_data_size % 16 or opts.in_capsule_data_size > 1 << 20:
            raise InvalidParams(
                "parameter 'in_capsule_data_size' must be a multiple of 16 up to 1 MiB")
        if opts.max_io_size < 8192 or opts.max_io_size & (opts.max_io_size - 1):
            # 4 KiB would be MDTS 0, which hosts read as "no limit"
            raise InvalidParams("parameter 'max_io_size' must be a power of two >= 8192")
        if opts.io_unit_size < 4096 or opts.io_unit_size % 4:
            raise InvalidParams("parameter 'io_unit_size' must be >= 4096 and a multiple of 4")
        for name in ("num_shared_buffers", "max_qpair_buffer_bytes", "max_connections",
                     "max_connections_per_address", "stall_timeout_sec", "r2t_timeout_sec"):
            v = getattr(opts, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidParams(f"parameter '{name}' must be an integer >= 0")
        if opts.num_shared_buffers == 0:
            raise InvalidParams("parameter 'num_shared_buffers' must be at least 1")
        if opts.placement not in PLACEMENTS:
            raise InvalidParams(
                f"parameter 'placement' must be one of {', '.join(PLACEMENTS)}")
        return opts

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def config_params(self) -> dict[str, Any]:
        d = asdict(self)
        if d["placement"] == "round_robin":
            del d["placement"]  # keep saved configs loadable by SPDK's nvmf_tgt
        for name in _OWN_LIMITS:  # likewise: only when changed from the default
            if d[name] == getattr(_DEFAULTS, name):
                del d[name]
        return d


TRANSPORT_SCHEMA = Schema(
    (
        Param("trtype", str, default="TCP"),
        Param("tgt_name", str),
        Param("max_queue_depth", int, check=positive),
        Param("max_io_qpairs_per_ctrlr", int, check=positive),
        Param("in_capsule_data_size", int),
        Param("max_io_size", int, check=positive),
        Param("io_unit_size", int, check=positive),
        Param("max_aq_depth", int, check=positive),
        Param("c2h_success", bool),
        Param("header_digest", bool),
        Param("data_digest", bool),
        Param("max_r2t_per_qpair", int, check=positive),
        Param("sock_priority", int),
        Param("abort_timeout_sec", int),
        Param("placement", str, choices=PLACEMENTS,
              help="how connections are spread over reactors (blocktarget's own)"),
        Param("num_shared_buffers", int,
              help="R2T data buffers (of io_unit_size) of the transport, split over the "
              "reactors; a write that does not fit waits for its R2T"),
        Param("max_qpair_buffer_bytes", int,
              help="R2T buffer bytes one connection may hold (0: no per-connection bound)"),
        Param("max_connections", int, help="open NVMe/TCP connections (0: unlimited)"),
        Param("max_connections_per_address", int,
              help="open connections from one host address (0: unlimited)"),
        Param("stall_timeout_sec", int,
              help="close a connection whose PDU stays incomplete, or that sends no "
              "Connect, this long (0: never)"),
        Param("r2t_timeout_sec", int,
              help="close a connection that leaves an R2T unanswered this long (0: never)"),
        Param("c_fast_path", bool,
              help="run reads, writes and flushes in the C data plane where the bdev allows "
              "(blocktarget's own; false: every command on the Python path)"),
        Param("c_net_poll", bool,
              help="serve the sockets of I/O queue pairs in their steady state from the "
              "reactor's C poller, the GIL released (blocktarget's own; false: the event "
              "loop reads them and calls the C lane)"),
        Param("tls_record_layer", str, choices=("auto", "user"),
              help="TLS record layer: auto = kernel TLS where the kernel has it, else user "
              "space (OpenSSL); user = always user space (blocktarget's own)"),
    ),
    # SPDK options with no meaning in this implementation: accepted so SPDK configs load
    extra_ok=frozenset({
        "buf_cache_size", "zcopy",
        "acceptor_poll_rate", "ack_timeout", "data_wr_pool_size", "control_msg_num",
        "disable_command_passthru", "max_srq_depth", "no_srq", "no_wr_batching",
        "num_cqe", "acceptor_backlog", "kas_enable", "transport_specific",
        # SPDK's rpc.py sends these vfio-user store_true flags (as false) on every call
        "disable_mappable_bar0", "disable_adaptive_irq", "disable_shadow_doorbells",
    }),
    refused={"dif_insert_or_strip": "end-to-end protection information (DIF) is not "
                                    "implemented"},
)


# blocktarget-only options, written by save_config only when set (SPDK would reject them)
_OWN_LIMITS = ("max_qpair_buffer_bytes", "max_connections", "max_connections_per_address",
               "stall_timeout_sec", "r2t_timeout_sec", "c_fast_path", "c_net_poll",
               "tls_record_layer")
_DEFAULTS = TransportOptions()
