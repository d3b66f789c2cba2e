"""celluscan.evaluation"""
