"""ldm.interop"""
