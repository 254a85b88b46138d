"""ldm.data"""
