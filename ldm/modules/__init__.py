"""ldm.modules"""
