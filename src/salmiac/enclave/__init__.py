"""enclave"""
