"""ldm.conditioning"""
