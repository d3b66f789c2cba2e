"""celluscan.serving"""
