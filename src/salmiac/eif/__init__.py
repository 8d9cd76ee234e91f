"""Enclave Image File (EIF): format, writer, reader and PCR measurements.

``format`` holds the byte layout, ``measure`` the pure PCR computation shared by ``writer`` (streams a
deterministic EIF like nitro-cli's EifBuilder) and ``reader`` (validates a hostile EIF, measures it,
describes it like ``nitro-cli describe-eif`` and extracts the boot parts for the emulator).
"""

from salmiac.eif.format import (
    CURRENT_VERSION,
    EIF_MAGIC,
    HEADER_SIZE,
    MAX_NUM_SECTIONS,
    SECTION_HEADER_SIZE,
    SIGNATURE_MAX_SIZE,
    EifError,
    EifHeader,
    SectionHeader,
    SectionType,
)
from salmiac.eif.measure import (
    HASH_ALGORITHM,
    PcrHasher,
    Pcrs,
    extend_zero,
    measure_blob,
    measure_sections,
    pcr8_from_certificate,
)
from salmiac.eif.reader import EifImage, read_eif, read_eif_bytes
from salmiac.eif.signature import (
    PcrSignature,
    certificate_info,
    encode_pcr_info,
    parse_signature_section,
    verify_pcr0_signature,
)
from salmiac.eif.writer import (
    EifInfo,
    EifMetadata,
    build_epoch_from_env,
    kernel_config_info,
    write_eif,
)

__all__ = [
    "CURRENT_VERSION",
    "EIF_MAGIC",
    "HASH_ALGORITHM",
    "HEADER_SIZE",
    "MAX_NUM_SECTIONS",
    "SECTION_HEADER_SIZE",
    "SIGNATURE_MAX_SIZE",
    "EifError",
    "EifHeader",
    "EifImage",
    "EifInfo",
    "EifMetadata",
    "PcrHasher",
    "PcrSignature",
    "Pcrs",
    "SectionHeader",
    "SectionType",
    "build_epoch_from_env",
    "certificate_info",
    "encode_pcr_info",
    "extend_zero",
    "kernel_config_info",
    "measure_blob",
    "measure_sections",
    "parse_signature_section",
    "pcr8_from_certificate",
    "read_eif",
    "read_eif_bytes",
    "verify_pcr0_signature",
    "write_eif",
]
