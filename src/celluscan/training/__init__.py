"""celluscan.training"""
