"""NVMe and NVMe-over-Fabrics numbers, shared by the target and the initiator.

Every value here was checked against the Linux kernel (`include/linux/nvme.h`,
`drivers/nvme/target/*.c`) and SPDK (`include/spdk/nvme_spec.h`, `nvmf_spec.h`); the
member names are the documentation. Nothing here imports other blocktarget modules,
so both sides of the wire can depend on it without a cycle.

Status representation (used everywhere in blocktarget, including `bdev.Status`):

    status = DNR << 14 | MORE << 13 | CRD << 11 | SCT << 8 | SC      (15 bits)

i.e. the CQE Status Field without the phase tag. On the wire it sits in CQE dword 3
above the command id and phase bit:

    CQE dword 3 = CID (15:0) | P (16) | status << 17   (P is always 0 on fabrics)
    CQE bytes 14..15 (le16)  = status << 1 | P

This is the kernel's convention (`nvme_completion.status >> 1`), and `(sct << 8) | sc`
without flags is exactly what a bdev reports, so a backend failure becomes a CQE status
with one OR (`| STATUS_DNR`).
"""

from __future__ import annotations

import enum

# ---------------------------------------------------------------------------
# Sizes and well-known values
# ---------------------------------------------------------------------------

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
NQN_UUID_PREFIX = "nqn.2014-08.org.nvmexpress:uuid:"
NQN_FIELD_LEN = 256
NQN_MAX_LEN = 223
TRSVCID_LEN = 32
TRADDR_LEN = 256
TSAS_LEN = 256

SQE_SIZE = 64
CQE_SIZE = 16
IDENTIFY_DATA_SIZE = 4096
CONNECT_DATA_SIZE = 1024
DISCOVERY_LOG_HEADER_SIZE = 1024
DISCOVERY_LOG_ENTRY_SIZE = 1024
ERROR_LOG_ENTRY_SIZE = 64
SMART_LOG_SIZE = 512
FW_SLOT_LOG_SIZE = 512
CMD_EFFECTS_LOG_SIZE = 4096
ANA_LOG_HEADER_SIZE = 16
ANA_GROUP_DESC_SIZE = 32

NSID_ALL = 0xFFFFFFFF
MAX_CHANGED_NAMESPACES = 1024
CHANGED_NS_OVERFLOW = 0xFFFFFFFF
NS_LIST_MAX = 1024
DSM_MAX_RANGES = 256
DSM_RANGE_SIZE = 16

CNTLID_MIN = 1
CNTLID_MAX = 0xFFEF
CNTLID_DYNAMIC = 0xFFFF

MIN_ADMIN_MAX_SQ_SIZE = 32
ERROR_LOCATION_NONE = 0xFFFF
NSSR_RESET_VALUE = 0x4E564D65

CONNECT_RECFMT = 0
DISCOVERY_LOG_RECFMT = 0

# ---------------------------------------------------------------------------
# Opcodes
# ---------------------------------------------------------------------------


class AdminOpcode(enum.IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NS_MANAGEMENT = 0x0D
    FIRMWARE_COMMIT = 0x10
    FIRMWARE_IMAGE_DOWNLOAD = 0x11
    DEVICE_SELF_TEST = 0x14
    NS_ATTACHMENT = 0x15
    KEEP_ALIVE = 0x18
    DIRECTIVE_SEND = 0x19
    DIRECTIVE_RECEIVE = 0x1A
    VIRTUALIZATION_MANAGEMENT = 0x1C
    NVME_MI_SEND = 0x1D
    NVME_MI_RECEIVE = 0x1E
    DOORBELL_BUFFER_CONFIG = 0x7C
    FORMAT_NVM = 0x80
    SECURITY_SEND = 0x81
    SECURITY_RECEIVE = 0x82
    SANITIZE = 0x84
    GET_LBA_STATUS = 0x86


ADMIN_VENDOR_SPECIFIC_START = 0xC0


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    VERIFY = 0x0C
    RESERVATION_REGISTER = 0x0D
    RESERVATION_REPORT = 0x0E
    RESERVATION_ACQUIRE = 0x11
    IO_MANAGEMENT_RECEIVE = 0x12
    RESERVATION_RELEASE = 0x15
    COPY = 0x19
    IO_MANAGEMENT_SEND = 0x1D
    ZONE_MGMT_SEND = 0x79
    ZONE_MGMT_RECV = 0x7A
    ZONE_APPEND = 0x7D


IO_VENDOR_SPECIFIC_START = 0x80

FABRICS_OPCODE = 0x7F


class FabricsType(enum.IntEnum):
    PROPERTY_SET = 0x00
    CONNECT = 0x01
    PROPERTY_GET = 0x04
    AUTH_SEND = 0x05
    AUTH_RECV = 0x06
    DISCONNECT = 0x08


FABRICS_VENDOR_SPECIFIC_START = 0xC0


class DataTransfer(enum.IntEnum):
    """Opcode bits 1:0 give the data direction, for admin, I/O and fctype alike."""

    NONE = 0
    HOST_TO_CTRL = 1
    CTRL_TO_HOST = 2
    BIDIRECTIONAL = 3


def data_transfer(opcode: int) -> DataTransfer:
    """Direction of a command's data, from its opcode (or fctype for fabrics)."""
    return DataTransfer(opcode & 3)


# ---------------------------------------------------------------------------
# Submission queue entry fields
# ---------------------------------------------------------------------------


class CmdFlags(enum.IntFlag):
    """SQE byte 1: FUSE in bits 1:0, PSDT in bits 7:6."""

    FUSE_FIRST = 1 << 0
    FUSE_SECOND = 1 << 1
    PSDT_SGL_MPTR_CONTIG = 1 << 6
    PSDT_SGL_MPTR_SGL = 1 << 7


FUSE_MASK = 0x03
PSDT_SHIFT = 6
PSDT_MASK = 0xC0


class Psdt(enum.IntEnum):
    PRP = 0
    SGL_MPTR_CONTIG = 1
    SGL_MPTR_SGL = 2


class SglType(enum.IntEnum):
    """SGL descriptor type: the high nibble of SGL byte 15 (SQE byte 39)."""

    DATA_BLOCK = 0x0
    BIT_BUCKET = 0x1
    SEGMENT = 0x2
    LAST_SEGMENT = 0x3
    KEYED_DATA_BLOCK = 0x4
    TRANSPORT_DATA_BLOCK = 0x5
    VENDOR_SPECIFIC = 0xF


class SglSubtype(enum.IntEnum):
    """SGL descriptor subtype: the low nibble of SGL byte 15."""

    ADDRESS = 0x0
    OFFSET = 0x1
    TRANSPORT = 0xA
    INVALIDATE_KEY = 0xF


def sgl_id(desc_type: int, subtype: int) -> int:
    """The SGL identifier byte (type in bits 7:4, subtype in bits 3:0)."""
    return (desc_type << 4) | subtype


SGL_ID_INCAPSULE = sgl_id(SglType.DATA_BLOCK, SglSubtype.OFFSET)
SGL_ID_TRANSPORT = sgl_id(SglType.TRANSPORT_DATA_BLOCK, SglSubtype.TRANSPORT)


class RwFlags(enum.IntFlag):
    """Read/Write/Compare/Write Zeroes/Verify command dword 12 bits above NLB."""

    STC = 1 << 24
    DEAC = 1 << 25
    PRCHK_REF = 1 << 26
    PRCHK_APP = 1 << 27
    PRCHK_GUARD = 1 << 28
    PRACT = 1 << 29
    FUA = 1 << 30
    LR = 1 << 31


RW_NLB_MASK = 0xFFFF
RW_DTYPE_SHIFT = 20
RW_DTYPE_MASK = 0xF << RW_DTYPE_SHIFT


class DsmAttr(enum.IntFlag):
    """Dataset Management command dword 11."""

    IDR = 1 << 0
    IDW = 1 << 1
    AD = 1 << 2


DSM_NR_MASK = 0xFF

# ---------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------


class Sct(enum.IntEnum):
    GENERIC = 0x0
    COMMAND_SPECIFIC = 0x1
    MEDIA_ERROR = 0x2
    PATH = 0x3
    VENDOR_SPECIFIC = 0x7


class GenericStatus(enum.IntEnum):
    SUCCESS = 0x00
    INVALID_OPCODE = 0x01
    INVALID_FIELD = 0x02
    CID_CONFLICT = 0x03
    DATA_XFER_ERROR = 0x04
    ABORTED_POWER_LOSS = 0x05
    INTERNAL = 0x06
    ABORTED_BY_REQUEST = 0x07
    ABORTED_SQ_DELETION = 0x08
    ABORTED_FAILED_FUSED = 0x09
    ABORTED_MISSING_FUSED = 0x0A
    INVALID_NS = 0x0B
    COMMAND_SEQUENCE_ERROR = 0x0C
    SGL_SEGMENT_DESCRIPTOR_INVALID = 0x0D
    SGL_DESCRIPTOR_COUNT_INVALID = 0x0E
    DATA_SGL_LENGTH_INVALID = 0x0F
    METADATA_SGL_LENGTH_INVALID = 0x10
    SGL_DESCRIPTOR_TYPE_INVALID = 0x11
    INVALID_USE_OF_CMB = 0x12
    PRP_OFFSET_INVALID = 0x13
    ATOMIC_WRITE_UNIT_EXCEEDED = 0x14
    OPERATION_DENIED = 0x15
    INVALID_SGL_OFFSET = 0x16
    HOST_ID_INCONSISTENT_FORMAT = 0x18
    KEEP_ALIVE_EXPIRED = 0x19
    KEEP_ALIVE_INVALID = 0x1A
    ABORTED_PREEMPT = 0x1B
    SANITIZE_FAILED = 0x1C
    SANITIZE_IN_PROGRESS = 0x1D
    SGL_DATA_BLOCK_GRANULARITY_INVALID = 0x1E
    COMMAND_NOT_SUPPORTED_FOR_CMB_QUEUE = 0x1F
    NS_WRITE_PROTECTED = 0x20
    COMMAND_INTERRUPTED = 0x21
    TRANSIENT_TRANSPORT_ERROR = 0x22
    COMMAND_PROHIBITED_BY_LOCKDOWN = 0x23
    ADMIN_COMMAND_MEDIA_NOT_READY = 0x24
    LBA_OUT_OF_RANGE = 0x80
    CAPACITY_EXCEEDED = 0x81
    NS_NOT_READY = 0x82
    RESERVATION_CONFLICT = 0x83
    FORMAT_IN_PROGRESS = 0x84


class CommandStatus(enum.IntEnum):
    """Command specific (SCT 1) codes of admin and NVM commands."""

    INVALID_CQ = 0x00
    INVALID_QID = 0x01
    INVALID_QUEUE_SIZE = 0x02
    ABORT_LIMIT_EXCEEDED = 0x03
    ASYNC_EVENT_LIMIT_EXCEEDED = 0x05
    INVALID_FW_SLOT = 0x06
    INVALID_FW_IMAGE = 0x07
    INVALID_INTERRUPT_VECTOR = 0x08
    INVALID_LOG_PAGE = 0x09
    INVALID_FORMAT = 0x0A
    FW_REQUIRES_CONVENTIONAL_RESET = 0x0B
    INVALID_QUEUE_DELETION = 0x0C
    FEATURE_ID_NOT_SAVEABLE = 0x0D
    FEATURE_NOT_CHANGEABLE = 0x0E
    FEATURE_NOT_NS_SPECIFIC = 0x0F
    FW_REQUIRES_NVM_RESET = 0x10
    FW_REQUIRES_RESET = 0x11
    FW_REQUIRES_MAX_TIME_VIOLATION = 0x12
    FW_ACTIVATION_PROHIBITED = 0x13
    OVERLAPPING_RANGE = 0x14
    NS_INSUFFICIENT_CAPACITY = 0x15
    NS_ID_UNAVAILABLE = 0x16
    NS_ALREADY_ATTACHED = 0x18
    NS_IS_PRIVATE = 0x19
    NS_NOT_ATTACHED = 0x1A
    THIN_PROVISIONING_NOT_SUPPORTED = 0x1B
    CONTROLLER_LIST_INVALID = 0x1C
    SELF_TEST_IN_PROGRESS = 0x1D
    BOOT_PARTITION_WRITE_PROHIBITED = 0x1E
    INVALID_CONTROLLER_ID = 0x1F
    INVALID_SECONDARY_CONTROLLER_STATE = 0x20
    INVALID_NUM_CONTROLLER_RESOURCES = 0x21
    INVALID_RESOURCE_ID = 0x22
    SANITIZE_PROHIBITED = 0x23
    ANA_GROUP_ID_INVALID = 0x24
    ANA_ATTACH_FAILED = 0x25
    CONFLICTING_ATTRIBUTES = 0x80
    INVALID_PROTECTION_INFO = 0x81
    ATTEMPTED_WRITE_TO_RO_RANGE = 0x82
    COMMAND_SIZE_LIMIT_EXCEEDED = 0x83


class FabricsStatus(enum.IntEnum):
    """Command specific (SCT 1) codes of fabrics commands and the discovery log."""

    CONNECT_INCOMPATIBLE_FORMAT = 0x80
    CONNECT_CTRL_BUSY = 0x81
    CONNECT_INVALID_PARAM = 0x82
    CONNECT_RESTART_DISC = 0x83
    CONNECT_INVALID_HOST = 0x84
    INVALID_QUEUE_TYPE = 0x85
    DISCOVERY_RESTART = 0x90
    AUTH_REQUIRED = 0x91


class MediaStatus(enum.IntEnum):
    WRITE_FAULT = 0x80
    UNRECOVERED_READ_ERROR = 0x81
    GUARD_CHECK_ERROR = 0x82
    APPTAG_CHECK_ERROR = 0x83
    REFTAG_CHECK_ERROR = 0x84
    COMPARE_FAILURE = 0x85
    ACCESS_DENIED = 0x86
    DEALLOCATED_OR_UNWRITTEN_BLOCK = 0x87
    STORAGE_TAG_CHECK_ERROR = 0x88


class PathStatus(enum.IntEnum):
    INTERNAL_PATH_ERROR = 0x00
    ANA_PERSISTENT_LOSS = 0x01
    ANA_INACCESSIBLE = 0x02
    ANA_TRANSITION = 0x03
    CONTROLLER_PATH_ERROR = 0x60
    HOST_PATH_ERROR = 0x70
    ABORTED_BY_HOST = 0x71


STATUS_SC_MASK = 0x00FF
STATUS_SCT_SHIFT = 8
STATUS_SCT_MASK = 0x0700
STATUS_CRD_SHIFT = 11
STATUS_CRD_MASK = 0x1800
STATUS_MORE = 0x2000
STATUS_DNR = 0x4000
STATUS_SUCCESS = 0


def make_status(sct: int, sc: int, dnr: bool = False, more: bool = False, crd: int = 0) -> int:
    """Compose the 15-bit status (see the module docstring for where it goes on the wire)."""
    if not 0 <= sct <= 7 or not 0 <= sc <= 0xFF or not 0 <= crd <= 3:
        raise ValueError(f"status out of range: sct={sct} sc={sc} crd={crd}")
    status = (sct << STATUS_SCT_SHIFT) | sc | (crd << STATUS_CRD_SHIFT)
    if dnr:
        status |= STATUS_DNR
    if more:
        status |= STATUS_MORE
    return status


def status_sct(status: int) -> int:
    return (status & STATUS_SCT_MASK) >> STATUS_SCT_SHIFT


def status_sc(status: int) -> int:
    return status & STATUS_SC_MASK


def status_dnr(status: int) -> bool:
    return bool(status & STATUS_DNR)


_SC_ENUMS: dict[int, tuple[type[enum.IntEnum], ...]] = {
    Sct.GENERIC: (GenericStatus,),
    Sct.COMMAND_SPECIFIC: (CommandStatus, FabricsStatus),
    Sct.MEDIA_ERROR: (MediaStatus,),
    Sct.PATH: (PathStatus,),
}


def status_name(status: int, fabrics: bool = False) -> str:
    """A readable name for logs and metrics labels; command specific codes are ambiguous
    between NVM and fabrics commands, so the caller says which it completed."""
    sct, sc = status_sct(status), status_sc(status)
    enums = _SC_ENUMS.get(sct, ())
    if sct == Sct.COMMAND_SPECIFIC and fabrics:
        enums = enums[::-1]
    for cls in enums:
        try:
            name = cls(sc).name
            break
        except ValueError:
            continue
    else:
        name = f"SCT{sct:x}_SC{sc:02x}"
    flags = "".join(
        f"|{label}" for bit, label in ((STATUS_DNR, "DNR"), (STATUS_MORE, "MORE")) if status & bit
    )
    return name + flags


# ---------------------------------------------------------------------------
# Identify
# ---------------------------------------------------------------------------


class Cns(enum.IntEnum):
    NS = 0x00
    CTRL = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_DESC_LIST = 0x03
    CS_NS = 0x05
    CS_CTRL = 0x06
    CS_ACTIVE_NS_LIST = 0x07
    CS_INDEP_NS = 0x08
    ALLOCATED_NS_LIST = 0x10
    ALLOCATED_NS = 0x11
    NS_CTRL_LIST = 0x12
    CTRL_LIST = 0x13
    PRIMARY_CTRL_CAP = 0x14
    SECONDARY_CTRL_LIST = 0x15
    NS_GRANULARITY = 0x16
    UUID_LIST = 0x17
    ENDGRP_LIST = 0x19
    CS_ALLOCATED_NS_LIST = 0x1A
    CS_ALLOCATED_NS = 0x1B
    IO_COMMAND_SETS = 0x1C


class Csi(enum.IntEnum):
    NVM = 0x0
    KV = 0x1
    ZNS = 0x2


class NidType(enum.IntEnum):
    EUI64 = 0x01
    NGUID = 0x02
    UUID = 0x03
    CSI = 0x04


NID_LENGTHS: dict[int, int] = {
    NidType.EUI64: 8,
    NidType.NGUID: 16,
    NidType.UUID: 16,
    NidType.CSI: 1,
}


class CtrlType(enum.IntEnum):
    IO = 1
    DISCOVERY = 2
    ADMIN = 3


class Cmic(enum.IntFlag):
    MULTI_PORT = 1 << 0
    MULTI_CTRL = 1 << 1
    SRIOV = 1 << 2
    ANA = 1 << 3


class Oacs(enum.IntFlag):
    SECURITY = 1 << 0
    FORMAT = 1 << 1
    FIRMWARE = 1 << 2
    NS_MANAGEMENT = 1 << 3
    SELF_TEST = 1 << 4
    DIRECTIVES = 1 << 5
    NVME_MI = 1 << 6
    VIRTUALIZATION = 1 << 7
    DOORBELL_BUFFER = 1 << 8
    GET_LBA_STATUS = 1 << 9
    LOCKDOWN = 1 << 10


class Frmw(enum.IntFlag):
    """Identify FRMW; the number of slots is a 3-bit count in bits 3:1."""

    SLOT1_RO = 1 << 0
    ACTIVATION_WITHOUT_RESET = 1 << 4
    MULTIPLE_UPDATE_DETECTION = 1 << 5


FRMW_NUM_SLOTS_SHIFT = 1


class Lpa(enum.IntFlag):
    SMART_PER_NS = 1 << 0
    CMD_EFFECTS = 1 << 1
    EXTENDED_DATA = 1 << 2
    TELEMETRY = 1 << 3
    PERSISTENT_EVENT = 1 << 4
    SUPPORTED_LOG_PAGES = 1 << 5
    TELEMETRY_DA4 = 1 << 6


class Ctratt(enum.IntFlag):
    HOST_ID_128 = 1 << 0
    NON_OP_PS_PERMISSIVE = 1 << 1
    NVM_SETS = 1 << 2
    READ_RECOVERY_LEVELS = 1 << 3
    ENDURANCE_GROUPS = 1 << 4
    PREDICTABLE_LATENCY = 1 << 5
    TBKAS = 1 << 6
    NS_GRANULARITY = 1 << 7
    SQ_ASSOCIATIONS = 1 << 8
    UUID_LIST = 1 << 9
    ELBAS = 1 << 15


class Oncs(enum.IntFlag):
    COMPARE = 1 << 0
    WRITE_UNCORRECTABLE = 1 << 1
    DSM = 1 << 2
    WRITE_ZEROES = 1 << 3
    SAVE_SELECT = 1 << 4
    RESERVATIONS = 1 << 5
    TIMESTAMP = 1 << 6
    VERIFY = 1 << 7
    COPY = 1 << 8


class Fuses(enum.IntFlag):
    COMPARE_AND_WRITE = 1 << 0


class Vwc(enum.IntFlag):
    """Identify VWC: bit 0 present, bits 2:1 flush-broadcast support."""

    PRESENT = 1 << 0
    FLUSH_BROADCAST_NOT_SUPPORTED = 2 << 1
    FLUSH_BROADCAST_SUPPORTED = 3 << 1


class Sgls(enum.IntFlag):
    """Identify SGLS; bits 1:0 are an enumeration (1 any alignment, 2 dword aligned)."""

    SUPPORTED = 1
    SUPPORTED_DWORD_ALIGNED = 2
    KEYED = 1 << 2
    BIT_BUCKET = 1 << 16
    MPTR_CONTIG = 1 << 17
    OVERSIZED = 1 << 18
    MPTR_SGL = 1 << 19
    OFFSET = 1 << 20
    TRANSPORT = 1 << 21


class Anacap(enum.IntFlag):
    OPTIMIZED = 1 << 0
    NON_OPTIMIZED = 1 << 1
    INACCESSIBLE = 1 << 2
    PERSISTENT_LOSS = 1 << 3
    CHANGE = 1 << 4
    GRPID_NO_CHANGE = 1 << 6
    GRPID_NONZERO = 1 << 7


class Fcatt(enum.IntFlag):
    """Identify FCATT (byte 1802): controller model."""

    STATIC = 1 << 0


class Ofcs(enum.IntFlag):
    """Identify OFCS (bytes 1804..1805): optional fabrics commands."""

    DISCONNECT = 1 << 0


SQES_NVM = 0x66
CQES_NVM = 0x44


class NsFeat(enum.IntFlag):
    THIN = 1 << 0
    NS_ATOMICS = 1 << 1
    DEALLOC_ERROR = 1 << 2
    ID_NEVER_REUSED = 1 << 3
    OPTIMAL_PERF = 1 << 4


FLBAS_FORMAT_MASK = 0x0F
FLBAS_EXTENDED = 0x10
FLBAS_FORMAT_MSB_MASK = 0x60


class Nmic(enum.IntFlag):
    SHARED = 1 << 0


class NsAttr(enum.IntFlag):
    WRITE_PROTECTED = 1 << 0


class Dlfeat(enum.IntFlag):
    """Deallocate features: bits 2:0 are the value read back (1 zeroes, 2 all ones)."""

    READ_ZEROES = 1
    READ_ONES = 2
    WRITE_ZEROES_DEALLOC = 1 << 3
    GUARD_CRC = 1 << 4


# ---------------------------------------------------------------------------
# Log pages
# ---------------------------------------------------------------------------


class LogPage(enum.IntEnum):
    SUPPORTED_LOG_PAGES = 0x00
    ERROR = 0x01
    SMART = 0x02
    FW_SLOT = 0x03
    CHANGED_NS = 0x04
    CMD_EFFECTS = 0x05
    DEVICE_SELF_TEST = 0x06
    TELEMETRY_HOST = 0x07
    TELEMETRY_CTRL = 0x08
    ENDURANCE_GROUP = 0x09
    PREDICTABLE_LATENCY = 0x0A
    PREDICTABLE_LATENCY_EVENT = 0x0B
    ANA = 0x0C
    PERSISTENT_EVENT = 0x0D
    ENDURANCE_GROUP_EVENT = 0x0F
    MEDIA_UNIT_STATUS = 0x10
    CAPACITY_CONFIGURATION = 0x11
    FEATURE_IDS_EFFECTS = 0x12
    NVME_MI_EFFECTS = 0x13
    COMMAND_FEATURE_LOCKDOWN = 0x14
    BOOT_PARTITION = 0x15
    ROTATIONAL_MEDIA = 0x16
    DISCOVERY = 0x70
    RESERVATION_NOTIFICATION = 0x80
    SANITIZE_STATUS = 0x81


LOG_VENDOR_SPECIFIC_START = 0xC0

ANA_LOG_LSP_RGO = 1 << 0


class CmdEffects(enum.IntFlag):
    """Commands Supported and Effects entry; CSE is a 3-bit field in bits 18:16."""

    CSUPP = 1 << 0
    LBCC = 1 << 1
    NCC = 1 << 2
    NIC = 1 << 3
    CCC = 1 << 4
    UUID_SELECTION = 1 << 19


CMD_EFFECTS_CSER_SHIFT = 14
CMD_EFFECTS_CSER_MASK = 0x3 << CMD_EFFECTS_CSER_SHIFT
CMD_EFFECTS_CSE_SHIFT = 16
CMD_EFFECTS_CSE_MASK = 0x7 << CMD_EFFECTS_CSE_SHIFT
CMD_EFFECTS_SCOPE_SHIFT = 20
CMD_EFFECTS_SCOPE_MASK = 0xFFF << CMD_EFFECTS_SCOPE_SHIFT


class CmdEffectsCse(enum.IntEnum):
    NO_RESTRICTION = 0
    SINGLE_NS = 1
    ALL_NS = 2


class AnaState(enum.IntEnum):
    OPTIMIZED = 0x01
    NON_OPTIMIZED = 0x02
    INACCESSIBLE = 0x03
    PERSISTENT_LOSS = 0x04
    CHANGE = 0x0F


class SmartCritical(enum.IntFlag):
    SPARE = 1 << 0
    TEMPERATURE = 1 << 1
    RELIABILITY = 1 << 2
    READ_ONLY = 1 << 3
    VOLATILE_MEMORY_BACKUP = 1 << 4


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


class FeatureId(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MGMT = 0x02
    LBA_RANGE = 0x03
    TEMP_THRESH = 0x04
    ERR_RECOVERY = 0x05
    VOLATILE_WC = 0x06
    NUM_QUEUES = 0x07
    IRQ_COALESCE = 0x08
    IRQ_CONFIG = 0x09
    WRITE_ATOMIC = 0x0A
    ASYNC_EVENT = 0x0B
    AUTONOMOUS_POWER = 0x0C
    HOST_MEM_BUF = 0x0D
    TIMESTAMP = 0x0E
    KATO = 0x0F
    HCTM = 0x10
    NOPSC = 0x11
    READ_RECOVERY_LEVEL = 0x12
    PLM_CONFIG = 0x13
    PLM_WINDOW = 0x14
    LBA_STATUS_ATTRS = 0x15
    HOST_BEHAVIOR = 0x16
    SANITIZE_CONFIG = 0x17
    ENDURANCE_GROUP_EVENT = 0x18
    IO_COMMAND_SET_PROFILE = 0x19
    SPINUP_CONTROL = 0x1A
    FDP = 0x1D
    FDP_EVENTS = 0x1E
    SW_PROGRESS = 0x80
    HOST_ID = 0x81
    RESV_MASK = 0x82
    RESV_PERSIST = 0x83
    NS_WRITE_PROTECT = 0x84


FEATURE_VENDOR_SPECIFIC_START = 0xC0


class FeatureSelect(enum.IntEnum):
    """Get Features SEL, command dword 10 bits 10:8."""

    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED_CAPABILITIES = 3


FEATURE_FID_MASK = 0xFF
GET_FEATURES_SEL_SHIFT = 8
GET_FEATURES_SEL_MASK = 0x7 << GET_FEATURES_SEL_SHIFT
SET_FEATURES_SAVE = 1 << 31

VOLATILE_WC_ENABLE = 1 << 0
NUM_QUEUES_NCQR_SHIFT = 16

# ---------------------------------------------------------------------------
# Asynchronous events
# ---------------------------------------------------------------------------


class AsyncEventType(enum.IntEnum):
    ERROR = 0x0
    SMART = 0x1
    NOTICE = 0x2
    IO_COMMAND_SET = 0x6
    VENDOR_SPECIFIC = 0x7


class AsyncEventNotice(enum.IntEnum):
    NS_ATTR_CHANGED = 0x00
    FW_ACTIVATION_STARTING = 0x01
    TELEMETRY_LOG_CHANGED = 0x02
    ANA_CHANGE = 0x03
    DISCOVERY_LOG_CHANGE = 0xF0


class AsyncEventError(enum.IntEnum):
    WRITE_INVALID_DOORBELL = 0x0
    INVALID_DOORBELL_VALUE = 0x1
    DIAGNOSTIC_FAILURE = 0x2
    PERSISTENT_INTERNAL = 0x3
    TRANSIENT_INTERNAL = 0x4
    FW_IMAGE_LOAD = 0x5


class AsyncEventSmart(enum.IntEnum):
    SUBSYSTEM_RELIABILITY = 0x0
    TEMPERATURE_THRESHOLD = 0x1
    SPARE_BELOW_THRESHOLD = 0x2


class AsyncEventIo(enum.IntEnum):
    RESERVATION_LOG_AVAILABLE = 0x0
    SANITIZE_COMPLETED = 0x1


class AenConfig(enum.IntFlag):
    """Asynchronous Event Configuration (feature 0Bh dword 11) and Identify OAES bits;
    bits 7:0 are the SMART critical warnings (see `SmartCritical`)."""

    NS_ATTR = 1 << 8
    FW_ACTIVATION = 1 << 9
    TELEMETRY_LOG = 1 << 10
    ANA_CHANGE = 1 << 11
    DISCOVERY_LOG_CHANGE = 1 << 31


def make_aen_result(event_type: int, info: int, log_page: int) -> int:
    """CQE dword 0 of a completed Asynchronous Event Request."""
    return (event_type & 0x7) | ((info & 0xFF) << 8) | ((log_page & 0xFF) << 16)


# ---------------------------------------------------------------------------
# Controller properties (registers reached by Property Get/Set on fabrics)
# ---------------------------------------------------------------------------


class Property(enum.IntEnum):
    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    CMBLOC = 0x38
    CMBSZ = 0x3C
    BPINFO = 0x40
    BPRSEL = 0x44
    BPMBL = 0x48
    CMBMSC = 0x50
    CMBSTS = 0x58
    CRTO = 0x68
    PMRCAP = 0xE00
    PMRCTL = 0xE04
    PMRSTS = 0xE08
    PMREBS = 0xE0C
    PMRSWTP = 0xE10
    DOORBELLS = 0x1000


PROPERTY_SIZE: dict[int, int] = {
    Property.CAP: 8,
    Property.VS: 4,
    Property.INTMS: 4,
    Property.INTMC: 4,
    Property.CC: 4,
    Property.CSTS: 4,
    Property.NSSR: 4,
    Property.AQA: 4,
    Property.ASQ: 8,
    Property.ACQ: 8,
    Property.CMBLOC: 4,
    Property.CMBSZ: 4,
    Property.BPINFO: 4,
    Property.BPRSEL: 4,
    Property.BPMBL: 8,
    Property.CMBMSC: 8,
    Property.CMBSTS: 4,
}


class PropertySize(enum.IntEnum):
    """Property Get/Set ATTRIB bits 2:0 (SQE byte 40)."""

    SIZE_4 = 0
    SIZE_8 = 1


CAP_MQES_MASK = 0xFFFF
CAP_CQR = 1 << 16
CAP_AMS_SHIFT = 17
CAP_TO_SHIFT = 24
CAP_DSTRD_SHIFT = 32
CAP_NSSRS = 1 << 36
CAP_CSS_SHIFT = 37
CAP_BPS = 1 << 45
CAP_MPSMIN_SHIFT = 48
CAP_MPSMAX_SHIFT = 52
CAP_PMRS = 1 << 56
CAP_CMBS = 1 << 57
CAP_CRMS_CRWMS = 1 << 59
CAP_CRMS_CRIMS = 1 << 60


class CapCss(enum.IntFlag):
    """CAP.CSS bits (after shifting by CAP_CSS_SHIFT)."""

    NVM = 1 << 0
    IOCS = 1 << 6
    NO_IO = 1 << 7


class CapAms(enum.IntFlag):
    WRR = 1 << 0
    VENDOR = 1 << 1


CC_EN = 1 << 0
CC_CSS_SHIFT = 4
CC_CSS_MASK = 0x7 << CC_CSS_SHIFT
CC_MPS_SHIFT = 7
CC_MPS_MASK = 0xF << CC_MPS_SHIFT
CC_AMS_SHIFT = 11
CC_AMS_MASK = 0x7 << CC_AMS_SHIFT
CC_SHN_SHIFT = 14
CC_SHN_MASK = 0x3 << CC_SHN_SHIFT
CC_IOSQES_SHIFT = 16
CC_IOSQES_MASK = 0xF << CC_IOSQES_SHIFT
CC_IOCQES_SHIFT = 20
CC_IOCQES_MASK = 0xF << CC_IOCQES_SHIFT
CC_CRIME = 1 << 24

IOSQES_NVM = 6
IOCQES_NVM = 4


class CcCss(enum.IntEnum):
    NVM = 0x0
    IOCS = 0x6
    ADMIN_ONLY = 0x7


class CcAms(enum.IntEnum):
    ROUND_ROBIN = 0x0
    WRR_URGENT = 0x1
    VENDOR = 0x7


class Shn(enum.IntEnum):
    NONE = 0x0
    NORMAL = 0x1
    ABRUPT = 0x2


CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
CSTS_SHST_MASK = 0x3 << CSTS_SHST_SHIFT
CSTS_NSSRO = 1 << 4
CSTS_PP = 1 << 5


class Shst(enum.IntEnum):
    NORMAL = 0x0
    OCCURRING = 0x1
    COMPLETE = 0x2


AQA_ASQS_MASK = 0xFFF
AQA_ACQS_SHIFT = 16


def make_version(major: int, minor: int, tertiary: int = 0) -> int:
    """VS register / Identify VER layout."""
    return (major << 16) | (minor << 8) | tertiary


# ---------------------------------------------------------------------------
# Fabrics: transports, discovery, Connect
# ---------------------------------------------------------------------------


class TransportType(enum.IntEnum):
    PCIE = 0x0
    RDMA = 0x1
    FC = 0x2
    TCP = 0x3
    LOOP = 0xFE


class AddressFamily(enum.IntEnum):
    PCI = 0x0
    IPV4 = 0x1
    IPV6 = 0x2
    IB = 0x3
    FC = 0x4
    LOOP = 0xFE


class SubsystemType(enum.IntEnum):
    """Discovery log entry SUBTYPE."""

    REFERRAL = 0x1
    NVME = 0x2
    CURRENT_DISCOVERY = 0x3


class Treq(enum.IntFlag):
    """Discovery log entry TREQ; bits 1:0 are the secure channel enumeration."""

    SECURE_CHANNEL_REQUIRED = 0x1
    SECURE_CHANNEL_NOT_REQUIRED = 0x2
    DISABLE_SQFLOW = 1 << 2


TREQ_SECURE_CHANNEL_MASK = 0x3


class DiscEflags(enum.IntFlag):
    DUPRETINFO = 1 << 0
    EPCSD = 1 << 1


class TcpSecType(enum.IntEnum):
    NONE = 0
    TLS12 = 1
    TLS13 = 2


class DcType(enum.IntEnum):
    NOT_REPORTED = 0
    DIRECT = 1
    CENTRAL = 2


CONNECT_CATTR_DISABLE_SQFLOW = 1 << 2

CONNECT_AUTHREQ_ATR = 1 << 17
CONNECT_AUTHREQ_ASCR = 1 << 18

CONNECT_IATTR_DATA = 1 << 16
