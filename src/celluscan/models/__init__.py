"""celluscan.models"""
