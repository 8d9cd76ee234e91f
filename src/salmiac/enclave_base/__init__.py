"""enclave_base"""
