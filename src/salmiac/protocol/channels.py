"""Where each channel between parent and enclave lives.

On Nitro every channel is an AF_VSOCK stream from the enclave to the parent (CID 3). In local emulation the host
has no vhost-vsock, so each port is a virtio-serial port named ``salmiac.<port>`` whose host end is a Unix socket;
the same byte streams run over it unchanged. One port carries one long-lived stream.
"""

from __future__ import annotations

from typing import Final

PARENT_CID: Final = 3  # VMADDR_CID_PARENT: the parent instance, as seen from a Nitro enclave

HEARTBEAT_PORT: Final = 9000  # nitro-cli's ENCLAVE_READY_VSOCK_PORT
HEARTBEAT_BYTE: Final = 0xB7  # sent by the enclave, echoed by the parent

CONTROL_PORT: Final = 5000
NETWORK_PORT: Final = 5001
NBD_ROOTFS_PORT: Final = 5002
NBD_DISK_PORT: Final = 5003

ALL_PORTS: Final = (HEARTBEAT_PORT, CONTROL_PORT, NETWORK_PORT, NBD_ROOTFS_PORT, NBD_DISK_PORT)


def serial_port_name(port: int) -> str:
    """Name of the virtio-serial port standing in for vsock ``port`` in emulation."""
    return f"salmiac.{port}"
