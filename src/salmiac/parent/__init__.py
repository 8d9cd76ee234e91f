"""parent"""
