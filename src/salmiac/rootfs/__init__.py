"""rootfs"""
