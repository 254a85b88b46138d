"""ldm.models"""
