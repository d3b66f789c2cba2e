"""celluscan.data"""
