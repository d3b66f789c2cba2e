"""celluscan.inference"""
