"""casemask node: DICOM receive, queue, de-identify and forward."""
